//! Sentence sets for intelligibility checks of synthesised speech.

/// Twenty everyday sentences of the kind the fleet captions (meetings,
/// plans, news), written for the speech synthesis check and fixed before it
/// was first run.
pub const EVERYDAY: [&str; 20] = [
    "Good morning everyone, thank you for joining the call today.",
    "Let's start with a quick review of last week's action items.",
    "The new release is scheduled for the end of next month.",
    "Could you share your screen so we can all see the numbers?",
    "Our customers asked for better support on mobile devices.",
    "I will send the meeting notes to the whole team this afternoon.",
    "The budget for the second quarter has been approved.",
    "We need more time to finish testing the payment system.",
    "Please remember to update your tickets before Friday.",
    "The weather forecast says it will rain all weekend.",
    "She has been working on this project for three years.",
    "Traffic was heavy on the way to the office this morning.",
    "The library closes at six o'clock on weekdays.",
    "He bought fresh bread and cheese at the market.",
    "Our team won the regional competition last spring.",
    "The train to the airport leaves every twenty minutes.",
    "Let me know if you have any questions about the plan.",
    "The results will be published on the website tomorrow.",
    "We should schedule another meeting to discuss the design.",
    "Thank you all for your hard work, and have a great week.",
];

/// Harvard sentences, IEEE 1969, lists 1 and 2.
pub const HARVARD: [&str; 20] = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
];
